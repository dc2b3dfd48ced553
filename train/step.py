"""One training step: sharded params, micro-batch accumulation, AdamW on the trainable part.

The model is split once into a graph definition and two plain nested dicts of arrays:

    params   the trainable parameters: the top-level submodules the model's `train_stages`
             table names for the stage (VipLlava "projector": the projector; "full": the
             projector, the decoder and lm_head; "lora": the projector and the decoder's LoRA
             adapters; "all": everything), the only ones the optimizer sees
    frozen   the rest (VipLlava: the vision tower, except in "all"); no gradients, no
             optimizer state

and the step is a pure function of those dicts, jitted with explicit shardings:

    batch [B, ...] --split into grad_accum strided micro-batches--> [A, B/A, ...]
      lax.scan over micro-batches: grads of the *summed* token loss, added up
      / (number of counted tokens in the whole batch)     -> mean-token loss and its gradient
      clip_by_global_norm -> AdamW (warmup + cosine lr)   -> new params

Dividing by the global token count once, at the end, makes the loss and the gradients the
same for any device count and any number of micro-batches (up to float summation order).

The model supplies the loss (`loss_terms`) and the parts that can run a fused attention kernel
(`attention_dtypes`), so VipLlava and the VisionEncoderDecoder captioner share this step. The
kernel of each part (`attention_kernels`, from `TrainConfig.attention` and the mesh's platform)
and the remat policy of the decoder layers (`REMAT_POLICIES`) are chosen once, when the step is
traced, and passed to `loss_terms` as arguments.

Batches are dicts of arrays with `labels` [B, T] (-100 = not counted) and whatever the model's
`loss_terms(batch) -> (summed NLL, counted tokens)` reads: for VipLlava `input_ids`,
`attention_mask` [B, T] and optionally `pixel_values` [B*k, 3, H, W] (k images per row, the
same for every row) and `position_ids`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from vipllava_jax.nn.sharding import LOGICAL_AXIS_RULES, state_shardings
from vipllava_jax.train import lora
from vipllava_jax.train.config import ATTENTION, REMAT_POLICIES, TrainConfig
from vipllava_jax.train.mesh import batch_sharding, data_sharding, replicated

Batch = dict[str, jax.Array]
Params = dict[str, Any]  # nested dicts of arrays, keyed like the model's attributes

@struct.dataclass
class TrainState:
    """Everything a step reads and rewrites (donated to the step)."""

    step: jax.Array  # int32 scalar: steps taken so far
    params: Params  # trainable
    frozen: Params  # never updated
    opt_state: optax.OptState  # AdamW moments shaped (and sharded) like `params`


# -- optimizer ---------------------------------------------------------------------------------

def learning_rate_schedule(config: TrainConfig) -> optax.Schedule:
    """Step -> learning rate: linear warmup from 0, then cosine decay to 0 at total_steps
    (a warmup as long as the run: the warmup alone, optax's cosine needs a decay step)."""
    if config.warmup_steps >= config.total_steps > 0:
        return optax.linear_schedule(0.0, config.learning_rate, config.warmup_steps)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=config.learning_rate, warmup_steps=config.warmup_steps,
        decay_steps=max(config.total_steps, 1), end_value=0.0,
    )


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """clip_by_global_norm -> AdamW with the warmup + cosine schedule (trainable params only)
    -> the updates of the submodules in `config.lr_multipliers` scaled."""
    chain = [
        optax.clip_by_global_norm(config.max_grad_norm),
        optax.adamw(
            learning_rate_schedule(config), b1=config.b1, b2=config.b2, eps=config.eps,
            weight_decay=config.weight_decay, mask=_decay_mask,
        ),
    ]
    if config.lr_multipliers:  # (only then: without, the optimizer state keeps its old layout)
        chain.append(_scale_submodules(dict(config.lr_multipliers)))
    return optax.chain(*chain)


def _scale_submodules(factors: dict[str, float]) -> optax.GradientTransformation:
    """Multiplies the updates under each top-level key of `factors` by its factor."""

    def update(updates, state, params=None):
        del params
        return {k: jax.tree.map(lambda u, f=factors[k]: u * f, v) if k in factors else v
                for k, v in updates.items()}, state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def _decay_mask(params: Params) -> Params:
    """Weight decay on matrices (kernels, embeddings) only, not on biases and norm scales."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


# -- train state -------------------------------------------------------------------------------

def trainable_filter(model: nnx.Module, stage: str) -> nnx.filterlib.Filter:
    """The NNX filter of the parameters `stage` trains (the model's `train_stages`)."""
    stages = type(model).train_stages
    if stage not in stages:
        raise ValueError(f"{type(model).__name__} has no stage {stage!r} (its stages: {sorted(stages)})")
    roots = stages[stage]
    trained = nnx.All(nnx.Param, lambda path, _: str(path[0]) in roots)
    return nnx.Any(trained, lora.LoRAParam) if stage == "lora" else trained


def init_train_state(
    model: nnx.Module, config: TrainConfig, mesh: Mesh, rules=LOGICAL_AXIS_RULES
) -> tuple[nnx.GraphDef, TrainState, TrainState]:
    """Splits `model` and places its parameters and a fresh optimizer state on `mesh`.

    Parameters are sharded by the logical-axis rules; the AdamW moments take the sharding
    of the parameter they belong to (`optax.tree_map_params`), scalars are replicated.
    The state may reuse the model's arrays, and the step donates the state: after the first
    step use `merge_model(graphdef, state)`, not `model`. In stage "lora" the adapters are
    added to `model` here (in place; `lora.merge_lora` folds them back in).

    Returns:
      (graphdef, state, shardings): `shardings` is a TrainState of NamedShardings, the
      in/out shardings for `make_train_step`.
    """
    graphdef, params, frozen, opt, shardings = _split_for_training(model, config, mesh, rules)
    params = jax.device_put(params, shardings.params)
    frozen = jax.device_put(frozen, shardings.frozen)
    opt_state = jax.jit(opt.init, out_shardings=shardings.opt_state)(params)
    step = jax.device_put(jnp.zeros((), jnp.int32), shardings.step)
    return graphdef, TrainState(step, params, frozen, opt_state), shardings


def abstract_train_state(
    model: nnx.Module, config: TrainConfig, mesh: Mesh, rules=LOGICAL_AXIS_RULES
) -> tuple[nnx.GraphDef, TrainState, TrainState]:
    """As `init_train_state`, with `jax.ShapeDtypeStruct`s (carrying their shardings) for
    arrays: nothing is allocated, so a step can be lowered and compiled for any model size,
    e.g. for a model from `.abstract(...)` on compile-only devices (benchmarks/gpu_hlo.py)."""
    graphdef, params, frozen, opt, shardings = _split_for_training(model, config, mesh, rules)
    state = TrainState(jax.ShapeDtypeStruct((), jnp.int32), params, frozen, jax.eval_shape(opt.init, params))
    state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
    return graphdef, state, shardings


def _split_for_training(model, config: TrainConfig, mesh: Mesh, rules):
    """What `init_train_state` and `abstract_train_state` share: the checks, the LoRA
    adapters, the split into (graphdef, trained and frozen pure dicts), the optimizer and
    every part's sharding."""
    trainable_filter(model, config.stage)  # an unknown stage fails before the model changes
    if config.stage == "lora":
        lora.add_lora(model, rank=config.lora_rank, alpha=config.lora_alpha, targets=config.lora_targets)
    graphdef, trainable, frozen = nnx.split(model, trainable_filter(model, config.stage), ...)
    trained = set(nnx.to_pure_dict(trainable))  # top-level submodules
    unknown = sorted({k for k, _ in config.lr_multipliers} - trained)
    if unknown:
        raise ValueError(f"lr_multipliers names {unknown}, which stage {config.stage!r} does not "
                         f"train (it trains {sorted(trained)})")
    param_sh = nnx.to_pure_dict(state_shardings(trainable, mesh, rules))
    frozen_sh = nnx.to_pure_dict(state_shardings(frozen, mesh, rules))
    params = nnx.to_pure_dict(trainable)
    opt = make_optimizer(config)
    opt_sh = optax.tree_map_params(
        opt, lambda _, sharding: sharding, jax.eval_shape(opt.init, params), param_sh,
        transform_non_params=lambda _: replicated(mesh),
    )
    shardings = TrainState(step=replicated(mesh), params=param_sh, frozen=frozen_sh, opt_state=opt_sh)
    return graphdef, params, nnx.to_pure_dict(frozen), opt, shardings


def merge_model(graphdef: nnx.GraphDef, state: TrainState) -> nnx.Module:
    """The model with the state's current parameters (for evaluation or saving)."""
    return nnx.merge(graphdef, state.params, state.frozen)


# -- loss and gradients ------------------------------------------------------------------------

def mesh_platform(mesh: Mesh | None = None) -> str:
    """The platform `attention_kernels` reads: "cuda" for NVIDIA GPUs, else the JAX platform
    name of the mesh's devices (of the default backend without a mesh)."""
    device = jax.devices()[0] if mesh is None else mesh.devices.flat[0]
    return "cuda" if device.platform == "gpu" and "NVIDIA" in device.device_kind else device.platform


def attention_kernels(model: nnx.Module | Mapping[str, Any], attention: str,
                      platform: str) -> dict[str, str | None]:
    """The attention kernel of each part of `model` that has a fused path, for the
    `TrainConfig.attention` choice `attention` on `platform` (`mesh_platform`): the
    `attention=` argument of the model's `loss_terms`.

    `model` is a model or its `attention_dtypes()` (part -> compute dtype). "xla": every part
    on dense masks (None); "cudnn" and "pallas": that kernel, on its hardware only, and cuDNN's
    for bf16/fp16 parts only; "auto": "pallas" on TPUs, "cudnn" for the bf16/fp16 parts on
    NVIDIA GPUs, else dense masks.
    """
    if attention not in ATTENTION:
        raise ValueError(f"attention must be one of {ATTENTION}, got {attention!r}")
    is_model = isinstance(model, nnx.Module)
    dtypes = {part: jnp.dtype(d) for part, d in (model.attention_dtypes() if is_model else model).items()}
    half = {part: d in (jnp.bfloat16, jnp.float16) for part, d in dtypes.items()}
    needs = {"cudnn": ("cuda", "NVIDIA GPUs"), "pallas": ("tpu", "TPUs")}
    if attention in needs:
        want, hardware = needs[attention]
        if platform != want:
            raise ValueError(f"attention={attention!r} runs on {hardware}; this mesh is on "
                             f"{platform!r} (use attention='auto' or 'xla')")
        if not dtypes:
            name = type(model).__name__ if is_model else "this model"
            raise ValueError(f"{name} has no fused attention path; use attention='xla'")
    if attention == "cudnn" and not all(half.values()):
        dtype = next(dtypes[part].name for part, is_half in half.items() if not is_half)
        raise ValueError(f"cuDNN's fused attention computes in bfloat16 or float16; this "
                         f"model computes in {dtype} (set the compute dtype to bfloat16, "
                         f"or use attention='xla')")
    if attention == "xla":
        return dict.fromkeys(dtypes)
    if platform == "tpu":
        return dict.fromkeys(dtypes, "pallas")
    return {part: "cudnn" if platform == "cuda" and is_half else None for part, is_half in half.items()}


def micro_batches(batch: Batch, grad_accum: int) -> Batch:
    """`[B, ...]` -> `[A, B/A, ...]`, micro-batch j taking rows j, j+A, j+2A, ...

    Strided rather than contiguous: with the batch sharded over the data axes in contiguous
    blocks, every device then holds its share of every micro-batch (no resharding, as long as
    the data axes divide B/A). Image arrays `[B*k, ...]` follow their rows (k images each).
    """
    b = batch["labels"].shape[0]
    if b % grad_accum:
        raise ValueError(f"batch size {b} is not a multiple of grad_accum={grad_accum}")

    def split(name, x):
        if x.shape[0] % b:
            raise ValueError(f"{name} has {x.shape[0]} rows, not a multiple of the batch size {b}")
        k = x.shape[0] // b  # rows of x per batch row (images per row for pixel_values)
        x = x.reshape(b // grad_accum, grad_accum, k, *x.shape[1:])  # [B/A, A, k, ...]
        return x.swapaxes(0, 1).reshape(grad_accum, (b // grad_accum) * k, *x.shape[3:])

    return {name: split(name, x) for name, x in batch.items()}


def loss_and_grads(
    graphdef: nnx.GraphDef,
    params: Params,
    frozen: Params,
    batch: Batch,
    *,
    grad_accum: int = 1,
    remat: str = "none",
    attention: str | Mapping[str, str | None] | None = None,
    mesh: Mesh | None = None,
    param_shardings: Params | None = None,
) -> tuple[jax.Array, Params, jax.Array]:
    """Mean-token loss over the whole batch and its gradient w.r.t. `params` (traceable).

    Args:
      graphdef, params, frozen: the model, split as by `init_train_state`.
      batch: the global batch (see the module docstring).
      grad_accum: run the batch as this many micro-batches (`lax.scan`): same result,
        1/grad_accum of the activation memory.
      remat: a `REMAT_POLICIES` name, the policy each decoder layer is rematerialised with.
      attention: a `TrainConfig.attention` choice, resolved by `attention_kernels` ("auto",
        "cudnn" and "pallas" read the platform of `mesh`, or of the default backend without
        one); or the kernels themselves, the `attention=` of the model's `loss_terms`; None:
        the model's default, dense masks.
      mesh, param_shardings: if given, micro-batches stay sharded over the data axes and the
        gradient accumulator like the params (sharding constraints; the values are unchanged).
    Returns:
      (loss, grads, tokens): float32 scalars and a tree like `params`.
    """
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat must be one of {sorted(REMAT_POLICIES)}, got {remat!r}")
    policy = REMAT_POLICIES[remat]
    if isinstance(attention, str):  # the model is merged here only to read its parts' dtypes
        attention = attention_kernels(nnx.merge(graphdef, params, frozen), attention, mesh_platform(mesh))

    def summed_loss(params, mb):
        model = nnx.merge(graphdef, params, frozen)
        return model.loss_terms(mb, attention=attention, remat=policy)  # (summed NLL, counted tokens)

    grad_fn = jax.value_and_grad(summed_loss, has_aux=True)

    def constrain(grads):
        if param_shardings is None:
            return grads
        return jax.lax.with_sharding_constraint(grads, param_shardings)

    if grad_accum == 1:  # no scan: a smaller program, same values
        (nll_sum, count), grad_sum = grad_fn(params, batch)
    else:
        micro = micro_batches(batch, grad_accum)  # [A, B/A, ...] each
        if mesh is not None:  # the micro-batch dimension stays over the data axes
            micro = {
                k: jax.lax.with_sharding_constraint(
                    x, NamedSharding(mesh, PartitionSpec(None, *batch_sharding(mesh, x.shape[1:]).spec))
                )
                for k, x in micro.items()
            }

        def body(carry, mb):
            grad_sum, nll_sum, count = carry
            (nll, n), grads = grad_fn(params, mb)
            grad_sum = constrain(jax.tree.map(jnp.add, grad_sum, grads))
            return (grad_sum, nll_sum + nll, count + n), None

        zeros = constrain(jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params))
        init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
        (grad_sum, nll_sum, count), _ = jax.lax.scan(body, init, micro)
    denom = jnp.maximum(count, 1.0)  # a batch without counted tokens: loss and grads 0
    grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), grad_sum, params)
    return nll_sum / denom, grads, count


# -- the step ----------------------------------------------------------------------------------

def make_train_step(
    graphdef: nnx.GraphDef, config: TrainConfig, mesh: Mesh, shardings: TrainState
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """The jitted step `(state, batch) -> (new_state, metrics)`.

    Args:
      graphdef, shardings: from `init_train_state`; the state goes in and comes out with
        `shardings`, and is donated (the old state's buffers are reused).
      config: the same TrainConfig the state was made with.
      mesh: the mesh of `shardings`.

    The batch goes in split over the data axes (`data_sharding(mesh)`; place it with
    `shard_batch`): its size must be a multiple of `data_parallel_size(mesh)` and of
    `grad_accum` (best of their product: each micro-batch then stays split over all devices).
    Metrics come back replicated: `loss` (mean over the counted tokens of the whole batch),
    `grad_norm` (before clipping), `learning_rate` (used for this step), `tokens` (counted).
    """
    opt = make_optimizer(config)
    schedule = learning_rate_schedule(config)

    def train_step(state: TrainState, batch: Batch):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):  # activations: `constrain`
            loss, grads, tokens = loss_and_grads(
                graphdef, state.params, state.frozen, batch, grad_accum=config.grad_accum,
                remat=config.remat, attention=config.attention, mesh=mesh,
                param_shardings=shardings.params,
            )
        updates, opt_state = opt.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            "loss": loss,
            "grad_norm": optax.global_norm(grads),
            "learning_rate": schedule(state.step),
            "tokens": tokens,
        }
        new_state = TrainState(step=state.step + 1, params=params, frozen=state.frozen, opt_state=opt_state)
        return new_state, metrics

    return jax.jit(
        train_step,
        in_shardings=(shardings, data_sharding(mesh)),
        out_shardings=(shardings, replicated(mesh)),
        donate_argnums=0,
    )

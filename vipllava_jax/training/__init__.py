"""Training: the mesh, the sharded train state and the jitted train step."""

from vipllava_jax.modeling import token_nll
from vipllava_jax.training.lora import LoRALinear, LoRAParam, add_lora, merge_lora
from vipllava_jax.training.mesh import (
    MESH_AXES, batch_sharding, data_parallel_size, data_sharding, mesh_from_spec, parse_mesh_spec,
    shard_batch,
)
from vipllava_jax.training.step import (
    REMAT_POLICIES, STAGES, TrainConfig, TrainState, abstract_train_state, init_train_state,
    learning_rate_schedule, loss_and_grads, make_optimizer, make_train_step, merge_model,
)

__all__ = [
    "LoRALinear",
    "LoRAParam",
    "MESH_AXES",
    "REMAT_POLICIES",
    "STAGES",
    "TrainConfig",
    "TrainState",
    "abstract_train_state",
    "add_lora",
    "batch_sharding",
    "data_parallel_size",
    "data_sharding",
    "init_train_state",
    "learning_rate_schedule",
    "loss_and_grads",
    "make_optimizer",
    "make_train_step",
    "merge_lora",
    "merge_model",
    "mesh_from_spec",
    "parse_mesh_spec",
    "shard_batch",
    "token_nll",
]

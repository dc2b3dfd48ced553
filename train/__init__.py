"""The training subsystem (installed as `vipllava_jax.train`).

    config.py       RunConfig (the run: TOML + overrides) and TrainConfig (optimizer, step)
    mesh.py         device meshes from "data=2,fsdp=4" specs, batch placement
    lora.py         LoRA adapters on the decoder's projections
    step.py         the sharded train state and the one jitted train step
    data.py         loaders: LLaVA conversations and image-caption pairs, resumable
    checkpoints.py  the run's Orbax checkpoints (state + loader position)
    flops.py        model FLOPs per step, for MFU
    loop.py         `train`: data -> step -> metrics and checkpoints
    export.py       a run's checkpoint as a model folder
    cli.py          `vipllava-train`
"""

from vipllava_jax.nn.losses import token_nll
from vipllava_jax.registry import STAGES
from vipllava_jax.train.config import REMAT_POLICIES, RunConfig, TrainConfig, TrainingError
from vipllava_jax.train.export import export_trained_model, load_trained_model
from vipllava_jax.train.loop import train
from vipllava_jax.train.lora import LoRALinear, LoRAParam, add_lora, merge_lora
from vipllava_jax.train.mesh import (
    MESH_AXES,
    batch_sharding,
    data_parallel_size,
    data_sharding,
    mesh_from_spec,
    parse_mesh_spec,
    shard_batch,
)
from vipllava_jax.train.step import (
    TrainState,
    abstract_train_state,
    init_train_state,
    learning_rate_schedule,
    loss_and_grads,
    make_optimizer,
    make_train_step,
    merge_model,
)

__all__ = [
    "LoRALinear", "LoRAParam", "MESH_AXES", "REMAT_POLICIES", "STAGES", "RunConfig", "TrainConfig",
    "TrainState", "TrainingError", "abstract_train_state", "add_lora", "batch_sharding",
    "data_parallel_size", "data_sharding", "export_trained_model", "init_train_state",
    "learning_rate_schedule", "load_trained_model", "loss_and_grads", "make_optimizer",
    "make_train_step", "merge_lora", "merge_model", "mesh_from_spec", "parse_mesh_spec",
    "shard_batch", "token_nll", "train",
]

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

import importlib

# The public names, by the module that defines them: imported on first use (PEP 562), so that
# `vipllava-train --help` does not import jax.
_EXPORTS = {
    "vipllava_jax.nn.losses": ("token_nll",),
    "vipllava_jax.registry": ("STAGES",),
    "vipllava_jax.train.config": ("REMAT_POLICIES", "RunConfig", "TrainConfig", "TrainingError"),
    "vipllava_jax.train.export": ("export_trained_model", "load_trained_model"),
    "vipllava_jax.train.loop": ("train",),
    "vipllava_jax.train.lora": ("LoRALinear", "LoRAParam", "add_lora", "merge_lora"),
    "vipllava_jax.train.mesh": ("MESH_AXES", "batch_sharding", "data_parallel_size", "data_sharding",
                                "mesh_from_spec", "parse_mesh_spec", "shard_batch"),
    "vipllava_jax.train.step": ("TrainState", "abstract_train_state", "init_train_state", "learning_rate_schedule",
                                "loss_and_grads", "make_optimizer", "make_train_step", "merge_model"),
}
_LAZY = {name: module for module, names in _EXPORTS.items() for name in names}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'vipllava_jax.train' has no attribute {name!r}")


__all__ = sorted(_LAZY)

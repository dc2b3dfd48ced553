"""A run's Orbax checkpoints: the manager over `output_dir/checkpoints`, and the loader
position saved beside the train state (every host's, on several hosts)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from vipllava_jax.train.config import RunConfig, TrainingError
from vipllava_jax.train.step import TrainState


def checkpoint_manager(cfg: RunConfig) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=cfg.keep, save_interval_steps=1, enable_async_checkpointing=True,
    )
    return ocp.CheckpointManager(Path(cfg.output_dir, "checkpoints").absolute(), options=options)


def data_state(loader) -> dict[str, Any]:
    """The loader position to save. One process: its `state_dict()`. Several: every process's
    (they differ: host index, and position when hosts skip different records) as
    `{"hosts": [...]}`, gathered to all, since only process 0 writes the JSON item."""
    state = loader.state_dict()
    if jax.process_count() == 1:
        return state
    from jax.experimental import multihost_utils

    raw = np.frombuffer(json.dumps(state).encode(), np.uint8)
    size = int(multihost_utils.process_allgather(np.int32(raw.size)).max())
    padded = np.zeros(size, np.uint8)
    padded[:raw.size] = raw
    rows = multihost_utils.process_allgather(padded)
    return {"hosts": [json.loads(bytes(r).rstrip(b"\0")) for r in np.asarray(rows)]}


def host_data_state(data_state: dict[str, Any]) -> dict[str, Any]:
    """This process's loader state from `data_state`'s output."""
    if "hosts" not in data_state:
        return data_state
    hosts = data_state["hosts"]
    if len(hosts) != jax.process_count():
        raise TrainingError(
            f"the checkpoint's data state was saved by {len(hosts)} processes, this run has "
            f"{jax.process_count()}")
    return hosts[jax.process_index()]


def restore(manager, step, state: TrainState, shardings: TrainState):
    target = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
    return restored["state"], restored["data"]

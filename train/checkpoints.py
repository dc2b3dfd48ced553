"""A run's Orbax checkpoints: the manager over `output_dir/checkpoints`, the loader position
saved beside the train state (every host's, on several hosts), restoring the newest one that
restores, and setting aside the ones that must not be resumed from."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from vipllava_jax import storage
from vipllava_jax.train.config import TrainingError
from vipllava_jax.train.step import TrainState

CHECKPOINTS = "checkpoints"
# Orbax's completeness marker of a step on object stores (no atomic rename there)
COMMIT_SUCCESS = "commit_success.txt"


def checkpoint_manager(run_dir: str | Path, keep: int | None = None, *, read_only: bool = False
                       ) -> ocp.CheckpointManager:
    """The manager of `run_dir/checkpoints` (the folder given, wherever the run was first
    written; a gs:// URL too: Orbax writes there through tensorstore). `keep`: the newest
    checkpoints kept (None: all)."""
    folder = storage.absolute(storage.path(run_dir) / CHECKPOINTS)
    if read_only and not folder.is_dir():
        raise TrainingError(f"no checkpoints in {storage.path(run_dir)} (no {CHECKPOINTS}/ folder)")
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, save_interval_steps=1, enable_async_checkpointing=not read_only,
        create=not read_only, read_only=read_only,
    )
    return ocp.CheckpointManager(folder, options=options)


def set_aside(manager: ocp.CheckpointManager, step: int, why: str):
    """Moves checkpoint `step` out of the manager's folder, to `checkpoints.WHY/STEP` beside it
    (kept for inspection, never resumed from); returns where it went (a Path, or an
    epath.Path on a bucket). On a bucket the move is a copy then a delete: the step's commit
    marker goes first, so a move cut short never leaves a half-deleted step that looks complete."""
    manager.wait_until_finished()
    src = storage.path(manager.directory) / str(step)
    dst = src.parent.parent / f"{CHECKPOINTS}.{why}" / str(step)
    if jax.process_index() == 0:
        if storage.is_remote(src):
            (src / COMMIT_SUCCESS).unlink(missing_ok=True)
        else:
            dst.parent.mkdir(exist_ok=True)
        storage.rmtree(dst)
        storage.move_tree(src, dst)  # a rename locally
    _sync(f"set_aside_{step}")
    manager.reload()
    return dst


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def reason(e: BaseException) -> str:
    """The first line of an exception's message, shortened."""
    text = str(e).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(e).__name__}: {first[:200]}" if first else type(e).__name__


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


def restore_latest(manager, state: TrainState, shardings: TrainState
                   ) -> tuple[int | None, TrainState, dict | None, list[tuple[int, str]]]:
    """The newest checkpoint that restores: (step, state, data state, skipped) where skipped
    lists the newer (step, reason) that did not restore, already set aside as damaged.
    (None, state, None, []) when there is no checkpoint. When none of them restores (a run
    config that no longer matches them, more likely than all being damaged), nothing is moved
    and the error names each one's reason."""
    failed = []
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            restored, data = restore(manager, step, state, shardings)
        except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise many types for bad files
            failed.append((step, reason(e)))
            continue
        for bad, _ in failed:
            set_aside(manager, bad, "damaged")
        return step, restored, data, failed
    if failed:
        reasons = "; ".join(f"step {s}: {r}" for s, r in failed)
        raise TrainingError(f"no checkpoint in {manager.directory} restores ({reasons})")
    return None, state, None, []


def restore(manager, step, state: TrainState, shardings: TrainState):
    target = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
    return restored["state"], restored["data"]

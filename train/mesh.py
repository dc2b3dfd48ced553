"""The training mesh from a command-line spec, and where a batch lives on it.

A spec names the size of each mesh axis, e.g. `"data=2,fsdp=4,tensor=1"`; one axis may be
`-1` to take whatever `jax.device_count()` leaves. Axes always come out in the order
data, fsdp, tensor (tensor innermost, on the closest devices); an axis the spec leaves out
has size 1. Which parameter dimension goes on which axis is decided by the logical-axis rules
(`vipllava_jax.nn.sharding`), not here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from vipllava_jax.nn.sharding import LOGICAL_AXIS_RULES, logical_to_spec, make_mesh

MESH_AXES = ("data", "fsdp", "tensor")


def parse_mesh_spec(spec: str, device_count: int) -> dict[str, int]:
    """`"data=2,fsdp=-1"` -> `{"data": 2, "fsdp": 4, "tensor": 1}` for 8 devices.

    Raises:
      ValueError: an unknown or repeated axis, a size that is not a positive integer (or one
        `-1`), or sizes whose product is not `device_count`.
    """
    sizes: dict[str, int] = {}
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        name, eq, value = (s.strip() for s in part.partition("="))
        if not eq:
            raise ValueError(f"mesh spec {spec!r}: {part!r} is not of the form axis=size")
        if name not in MESH_AXES:
            raise ValueError(
                f"mesh spec {spec!r}: unknown axis {name!r} (allowed: {', '.join(MESH_AXES)})"
            )
        if name in sizes:
            raise ValueError(f"mesh spec {spec!r}: axis {name!r} given twice")
        try:
            size = int(value)
        except ValueError:
            raise ValueError(f"mesh spec {spec!r}: size of {name!r} is not an integer: {value!r}") from None
        if size < 1 and size != -1:
            raise ValueError(f"mesh spec {spec!r}: size of {name!r} must be >= 1 or -1, got {size}")
        sizes[name] = size

    fill = [n for n, s in sizes.items() if s == -1]
    if len(fill) > 1:
        raise ValueError(f"mesh spec {spec!r}: only one axis may be -1, got {', '.join(fill)}")
    known = 1
    for s in sizes.values():
        known *= s if s != -1 else 1
    if fill:
        if device_count % known:
            raise ValueError(
                f"mesh spec {spec!r}: the other axes ({known} devices) do not divide the "
                f"{device_count} devices, so {fill[0]}=-1 cannot fill them"
            )
        sizes[fill[0]] = device_count // known
        known = device_count
    if known != device_count:
        raise ValueError(
            f"mesh spec {spec!r}: axis sizes multiply to {known}, but there are "
            f"{device_count} devices"
        )
    return {name: sizes.get(name, 1) for name in MESH_AXES}


def mesh_from_spec(spec: str, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with Auto axes (data, fsdp, tensor) over all devices, or over `devices`.

    Args:
      spec: e.g. `"data=2,fsdp=4,tensor=1"`; see `parse_mesh_spec`.
      devices: the devices to use (default: all of `jax.devices()`).
    """
    if devices is None:
        return make_mesh(parse_mesh_spec(spec, jax.device_count()))
    axes = parse_mesh_spec(spec, len(devices))
    return jax.make_mesh(
        tuple(axes.values()), tuple(axes), devices=list(devices),
        axis_types=(jax.sharding.AxisType.Auto,) * len(axes),
    )


def batch_sharding(mesh: Mesh, shape: Sequence[int], rules=LOGICAL_AXIS_RULES) -> NamedSharding:
    """Where an array of the batch goes: its leading (batch) dimension split over the mesh
    axes the rules give "batch" (data, fsdp), the other dimensions replicated.

    A batch size that those axes do not divide stays replicated (as the rules do for params).
    """
    names = ("batch",) + (None,) * (len(shape) - 1)
    return NamedSharding(mesh, logical_to_spec(names, tuple(shape), mesh, rules))


def data_parallel_size(mesh: Mesh, rules=LOGICAL_AXIS_RULES) -> int:
    """How many ways the batch is split: the product of the sizes of the mesh axes that the
    rules give "batch" (data x fsdp)."""
    axes = dict(rules)["batch"]
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    return math.prod(mesh.shape.get(a, 1) for a in axes)


def data_sharding(mesh: Mesh, rules=LOGICAL_AXIS_RULES) -> NamedSharding:
    """The sharding of every batch array whose size the data axes divide:
    `P(("data", "fsdp"))`, trailing dimensions replicated (a prefix for a whole batch dict)."""
    return NamedSharding(mesh, logical_to_spec(("batch",), (data_parallel_size(mesh, rules),), mesh, rules))


def shard_batch(batch: dict[str, Any], mesh: Mesh, rules=LOGICAL_AXIS_RULES) -> dict[str, jax.Array]:
    """Places this host's rows of a batch (numpy arrays) on `mesh`, rows split over the data
    axes.

    On several hosts (`jax.process_count() > 1`) each process passes its LOCAL rows (as
    `TrainDataLoader` yields them: host `p` reads its own share) and the global batch is their
    concatenation in process order, `jax.make_array_from_process_local_data`; the global
    leading dimension is `rows x process_count`. On one host this is `jax.device_put` of the
    whole batch.

    Raises:
      ValueError: a global leading dimension that the data-parallel size does not divide.
    """
    n = data_parallel_size(mesh, rules)
    hosts = jax.process_count()
    for name, x in batch.items():
        rows = np.shape(x)[0] * hosts
        if rows % n:
            per_host = f" ({np.shape(x)[0]} on each of {hosts} hosts)" if hosts > 1 else ""
            raise ValueError(
                f"{name} has {rows} rows{per_host}, not a multiple of the {n} devices the batch "
                f"is split over (mesh {dict(mesh.shape)})"
            )
    sharding = data_sharding(mesh, rules)
    if hosts == 1:
        return jax.device_put(dict(batch), sharding)
    return {name: jax.make_array_from_process_local_data(sharding, np.asarray(x))
            for name, x in batch.items()}


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())

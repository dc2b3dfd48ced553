"""Logical axis names -> mesh axes: the one rules table every mesh goes through.

Parameters are annotated with logical names where they are created (`out_sharding=('embed',
'mlp')`). Which mesh axis a logical name lands on is decided here and only here, so a training
job only has to pick a mesh. A dimension that the mesh axis does not divide (tiny test models,
odd vocabularies) stays replicated rather than failing.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# (logical axis, mesh axis or axes). Mesh axes missing from a mesh are ignored.
LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vision_features", "fsdp"),  # the projector's concatenated multi-layer input
    ("conv", None),  # the patch conv's kh, kw, in-channels
    ("norm", None),
    ("seq", None),
)


def logical_to_spec(
    names: Sequence[str | None],
    shape: Sequence[int],
    mesh: Mesh,
    rules: Sequence[tuple[str, str | tuple[str, ...] | None]] = LOGICAL_AXIS_RULES,
) -> PartitionSpec:
    """The PartitionSpec for an array whose axes carry `names`, on `mesh`.

    A mesh axis is used at most once per array, and only where it divides the dimension.
    """
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name, dim in zip(names, shape, strict=True):
        target = table.get(name) if name is not None else None
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        axes = tuple(a for a in axes if a in mesh.shape and a not in used)
        size = 1
        for a in axes:
            size *= mesh.shape[a]
        if not axes or dim % size != 0:
            spec.append(None)
            continue
        used.update(axes)
        spec.append(axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*spec)


def state_shardings(state: nnx.State, mesh: Mesh, rules=LOGICAL_AXIS_RULES) -> nnx.State:
    """A NamedSharding for every Variable of an (abstract) NNX state, from its `out_sharding`."""

    def one(var):
        names = var.get_metadata().get("out_sharding") or (None,) * len(var.get_value().shape)
        return var.replace(NamedSharding(mesh, logical_to_spec(names, var.get_value().shape, mesh, rules)))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def constrain(x: jax.Array, names: Sequence[str | None], rules=LOGICAL_AXIS_RULES) -> jax.Array:
    """Pins activation `x` to the sharding its logical axis `names` give on the current mesh.

    The mesh is the one in context (`jax.set_mesh`, or `use_abstract_mesh` as the train step
    sets inside its trace); without one this is a no-op, so single-device code and generation
    are unchanged. Used at layer boundaries so XLA's propagation cannot drift, e.g. into
    replicating the batch after an FSDP all-gather.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(names, x.shape, mesh, rules))


def make_mesh(axes: dict[str, int]) -> Mesh:
    """A mesh with Auto axes, e.g. `make_mesh({'data': 2, 'fsdp': 4})`."""
    names = tuple(axes)
    return jax.make_mesh(
        tuple(axes.values()), names, axis_types=(jax.sharding.AxisType.Auto,) * len(names)
    )

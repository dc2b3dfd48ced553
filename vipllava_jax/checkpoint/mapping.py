"""The machinery of a name-mapping table between transformers' weights and ours.

Each model family writes one `KeyMapping` (its folder's `mapping.py`): a parameter path of
ours maps to one canonical HF key and a transform pair (to_jax, to_hf) that are each other's
inverse; the HF reader and writer (`checkpoint.hf`) use it in both directions.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

import numpy as np


def identity(w: np.ndarray) -> np.ndarray:
    return w


@dataclasses.dataclass(frozen=True)
class Leaf:
    """How one of our leaf parameters is stored in HF: its name and the transform pair."""

    hf_name: str
    to_jax: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]


# (our leaf name, ndim) -> Leaf
LEAVES: dict[tuple[str, int], Leaf] = {
    # nn.Linear weight [out, in] <-> kernel [in, out]
    ("kernel", 2): Leaf("weight", np.transpose, np.transpose),
    # nn.Conv2d weight [out, in, kh, kw] <-> nnx.Conv kernel [kh, kw, in, out]
    ("kernel", 4): Leaf("weight", lambda w: w.transpose(2, 3, 1, 0), lambda w: w.transpose(3, 2, 0, 1)),
    ("scale", 1): Leaf("weight", identity, identity),  # LayerNorm / RMSNorm
    ("bias", 1): Leaf("bias", identity, identity),
    ("embedding", 2): Leaf("weight", identity, identity),  # nn.Embedding
    ("class_embedding", 1): Leaf("class_embedding", identity, identity),
}


def hf_shape(leaf: Leaf, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape HF stores for a parameter of ours of `shape` (no memory touched)."""
    return tuple(leaf.to_hf(np.broadcast_to(np.zeros((), np.int8), shape)).shape)


@dataclasses.dataclass(frozen=True)
class KeyMapping:
    """One model family's name table, as the HF reader and writer use it.

    hf_key_for: our parameter path, ndim -> canonical HF key, Leaf.
    canonical_key: a stored HF key of any known layout -> its canonical key.
    ignored: stored keys (canonical) that are buffers, skipped on read.
    tied_keys: canonical keys of a head tied to the embeddings, skipped on read when tied.
    resize: for layouts stored at another shape (a vocabulary grown on conversion):
      (canonical key, stored array, the shape wanted, read another stored tensor by canonical
      key) -> the array at the wanted shape; None if it cannot (then the shapes must agree).
    """

    hf_key_for: Callable[[str, int], tuple[str, Leaf]]
    canonical_key: Callable[[str], str]
    ignored: re.Pattern
    tied_keys: tuple[str, ...]
    resize: Callable[[str, np.ndarray, tuple[int, ...], Callable[[str], np.ndarray]], np.ndarray] | None = None
    resizable: Callable[[str, tuple[int, ...], tuple[int, ...]], bool] = lambda key, stored, wanted: False

"""The conversion subsystem (installed as `vipllava_jax.convert`): HF folders of every
registered family <-> Orbax folders, and training runs -> HF folders.

    conversions.py  hf_to_orbax / orbax_to_hf, through the family registry
    cli.py          `vipllava-convert`

The readers and writers they use (safetensors, Orbax, the mapping-table machinery) are in
`vipllava_jax.checkpoint`; each family's table is its folder's `mapping.py`.
"""

import importlib

_NAMES = ("hf_to_orbax", "orbax_to_hf")
__all__ = list(_NAMES)


def __getattr__(name: str):  # imported on first use (PEP 562): `vipllava-convert --help` stays fast
    if name in _NAMES:
        return getattr(importlib.import_module("vipllava_jax.convert.conversions"), name)
    raise AttributeError(f"module 'vipllava_jax.convert' has no attribute {name!r}")

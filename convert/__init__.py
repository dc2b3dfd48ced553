"""The conversion subsystem (installed as `vipllava_jax.convert`): HF folders of every
registered family <-> Orbax folders, and training runs -> HF folders.

    conversions.py  hf_to_orbax / orbax_to_hf, through the family registry
    cli.py          `vipllava-convert`

The readers and writers they use (safetensors, Orbax, the mapping-table machinery) are in
`vipllava_jax.checkpoint`; each family's table is its folder's `mapping.py`.
"""

from vipllava_jax.convert.conversions import hf_to_orbax, orbax_to_hf

__all__ = ["hf_to_orbax", "orbax_to_hf"]

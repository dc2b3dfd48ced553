"""The `vipllava-convert` command (installed as `vipllava_jax.convert`)."""

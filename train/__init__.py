"""The fine-tuning command (installed as `vipllava_jax.train`); filled in by the training issue."""

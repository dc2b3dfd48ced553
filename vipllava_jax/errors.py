"""Errors raised for bad input. Each message is one line that names the problem."""


class VipLlavaError(ValueError):
    """Base class: bad input given to vipllava_jax."""


class ConfigError(VipLlavaError):
    """A config.json that is missing, malformed, or describes another model."""


class CheckpointError(VipLlavaError):
    """A checkpoint with a missing, unexpected, mis-shaped or unreadable weight."""

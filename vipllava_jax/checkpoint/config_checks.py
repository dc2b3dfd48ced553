"""Checks every family's config reader applies to config.json values: one-line errors naming
the field, before anything computes with them."""

from __future__ import annotations

import json
from typing import Any

from vipllava_jax.errors import ConfigError


def check_numbers(values: dict[str, Any], where: str, counts=(), optional_counts=(), positive=()) -> None:
    """Sizes and counts are positive integers (a bool is not one), `positive` numbers > 0:
    a one-line error naming the field otherwise, before anything computes with them."""
    for name in (*counts, *optional_counts):
        x = values.get(name)
        if x is None and name in optional_counts:
            continue
        if isinstance(x, bool) or not isinstance(x, int) or x < 1:
            raise ConfigError(f"{where}{name} must be a positive integer, got {x!r}")
    for name in positive:
        x = values.get(name)
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not x > 0:
            raise ConfigError(f"{where}{name} must be a positive number, got {x!r}")


def check_object(d, where: str) -> dict[str, Any]:
    if not isinstance(d, dict):
        raise ConfigError(f"{where} must be a JSON object, got {type(d).__name__} {json.dumps(d)[:40]}")
    return d

"""`vipllava-train --config run.toml [key=value ...]`: fine-tune VipLlava (logic: vipllava_jax.train)."""

from __future__ import annotations

import argparse
import sys

from vipllava_jax.errors import VipLlavaError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="vipllava-train", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="a TOML run config (see README)")
    p.add_argument("overrides", nargs="*", help="key=value, e.g. steps=100 train.learning_rate=1e-4")
    args = p.parse_args(argv)

    import dataclasses

    from vipllava_jax.train import RunConfig, train
    from vipllava_jax.train.hosts import join_hosts

    try:
        cfg = RunConfig.from_file(args.config, args.overrides)
        join_hosts(dataclasses.asdict(cfg))  # before anything touches a device
        train(cfg)
    except (VipLlavaError, OSError) as e:
        print(f"vipllava-train: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

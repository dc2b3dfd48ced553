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

    try:
        from vipllava_jax.train import RunConfig, train
        from vipllava_jax.train.hosts import join_hosts
        from vipllava_jax.train.loop import Interrupted

        cfg = RunConfig.from_file(args.config, args.overrides)
        join_hosts(dataclasses.asdict(cfg))  # before anything touches a device
        train(cfg)
    except KeyboardInterrupt:  # before the first step, or a second Ctrl-C
        print("vipllava-train: interrupted (nothing saved since the last checkpoint)", file=sys.stderr)
        return 130
    except Interrupted as e:  # the first Ctrl-C: the step in progress finished and was saved
        print(f"vipllava-train: {e}", file=sys.stderr)
        return 130
    except (VipLlavaError, OSError) as e:
        print(f"vipllava-train: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`vipllava-train --config run.toml [key=value ...]`: fine-tune VipLlava (logic: vipllava_jax.train)."""

from __future__ import annotations

import argparse
import sys

from vipllava_jax.errors import VipLlavaError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="vipllava-train", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="a TOML run config (see README)")
    p.add_argument("overrides", nargs="*", help="key=value, e.g. steps=100 train.learning_rate=1e-4")
    p.add_argument("--validate", action="store_true",
                   help="only load every record of the data once (images, markers, tokens) and list the "
                        "ones a run would skip, with their lines; exit 1 if any")
    args = p.parse_args(argv)

    import dataclasses

    try:
        from vipllava_jax.train import RunConfig, train
        from vipllava_jax.train.hosts import join_hosts
        from vipllava_jax.train.loop import Interrupted

        cfg = RunConfig.from_file(args.config, args.overrides)
        if args.validate:
            from vipllava_jax.train.loop import validate_data

            usable, problems = validate_data(cfg)
            for line in problems:
                print(line)
            print(f"{usable} usable records, {len(problems)} a run would skip")
            return 1 if problems else 0
        join_hosts(dataclasses.asdict(cfg))  # before anything touches a device
        train(cfg)
    except KeyboardInterrupt:  # before the first step, or a second Ctrl-C
        print("vipllava-train: interrupted (nothing saved since the last checkpoint)", file=sys.stderr)
        return 130
    except Interrupted as e:  # the first Ctrl-C: the step in progress finished and was saved
        print(f"vipllava-train: {e}", file=sys.stderr)
        return 130
    except (VipLlavaError, OSError, *_remote_errors()) as e:
        print(f"vipllava-train: error: {e}", file=sys.stderr)
        return 2
    return 0


def _remote_errors() -> tuple[type[BaseException], ...]:
    """google-cloud-storage's errors (a gs:// output_dir: the run lock's requests), when installed."""
    try:
        from google.api_core.exceptions import GoogleAPIError
    except ImportError:
        return ()
    return (GoogleAPIError,)


if __name__ == "__main__":
    sys.exit(main())
